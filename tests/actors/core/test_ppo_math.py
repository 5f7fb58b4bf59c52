"""PPO math against a naive GAE loop, hand-derived losses and gradients, and exact identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from actors.core.metrics import check_keys
from actors.core.ppo_math import (
    PPOStats,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    place_step_rewards,
    policy_loss,
    truncated_is_weights,
    value_loss,
    whiten,
)

NAN = float("nan")


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def length_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (B, T)


# ---------------------------------------------------------------- masked helpers and whitening


def test_masked_mean_and_var_ignore_padding_even_nan():
    x = t64([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
    mask = length_mask([2, 1], 3)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0, rel=1e-12)
    # values 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(x, mask).item() == pytest.approx(42.0 / 9.0 / 2.0, rel=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(42.0 / 27.0, rel=1e-12)
    per_row = masked_mean(x, length_mask([2, 0], 3), dim=1)
    assert per_row.tolist() == [1.5, 0.0]  # an empty row gives 0


def test_whiten_gives_masked_mean_zero_var_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 3.0 + 5.0
    mask = length_mask([6, 2, 4, 1], 6)
    x = torch.where(mask, x, torch.tensor(1e6, dtype=torch.float64))  # padding garbage
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(w[~mask] == 0)
    real = x[mask]
    assert torch.allclose(w[mask], (real - real.mean()) / real.std(), rtol=1e-6)
    kept = whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(real.mean().item(), rel=1e-9)
    assert masked_var(kept, mask).item() == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------- log-probs and entropy


def test_logprobs_hand_numbers_and_log_softmax():
    logits = t64([[0.0, math.log(3.0)]]).unsqueeze(0)  # (1, 1, 2): p = (1/4, 3/4)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(
        math.log(0.75), rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    expected = F.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels), expected, rtol=1e-12)


def test_logprobs_upcast_half_precision():
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    out = logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.log_softmax(logits.float(), -1)[..., 0], rtol=1e-6)


def test_entropy_uniform_is_log_vocab_and_hand_value():
    mask = length_mask([3, 1], 3)
    uniform = torch.zeros(2, 3, 7, dtype=torch.float64)
    uniform[1, 1:] = torch.tensor([50.0] + [0.0] * 6, dtype=torch.float64)  # padding: peaked
    assert entropy_from_logits(uniform, mask).item() == pytest.approx(math.log(7.0), rel=1e-12)
    two = t64([[0.0, math.log(3.0)]]).unsqueeze(0)  # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(two, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------- shaped rewards


LOGPROBS = t64([[-1.0, -2.0, -0.5], [-0.7, 9.0, 9.0], [-1.5, -0.2, 9.0]])
REF_LOGPROBS = t64([[-1.5, -1.0, -0.5], [-0.2, 0.0, 0.0], [-1.0, -0.6, 0.0]])
MASK = length_mask([3, 1, 2], 3)
SCORES = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)


def test_kl_shaped_rewards_score_on_last_real_token():
    rewards, kl = kl_shaped_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, kl_coef=0.5)
    # log π − log π_ref: row 0 (0.5, −1, 0), row 1 (−0.5), row 2 (−0.5, 0.4); −β· that, + score
    expected = t64([[-0.25, 0.5, 2.0], [0.25 - 1.0, 0.0, 0.0], [0.25, -0.2 + 3.0, 0.0]])
    assert torch.allclose(rewards, expected, rtol=1e-12, atol=1e-15)
    assert torch.allclose(kl, torch.tensor([-0.5, -0.5, -0.1], dtype=torch.float64), rtol=1e-12)


def test_kl_shaped_rewards_add_step_rewards():
    steps = place_step_rewards([[-0.1, -0.2], [], [-0.3]], [[0, 2], [], [1]], (3, 3),
                               dtype=torch.float64)
    rewards, _ = kl_shaped_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, kl_coef=0.5,
                                   step_rewards=steps)
    expected = t64([[-0.35, 0.5, 1.8], [-0.75, 0.0, 0.0], [0.25, 2.5, 0.0]])
    assert torch.allclose(rewards, expected, rtol=1e-12, atol=1e-15)
    on_padding = place_step_rewards([[], [-0.1], []], [[], [2], []], (3, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rows \[1\] lie on padding"):
        kl_shaped_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, 0.5, step_rewards=on_padding)


def test_kl_shaped_rewards_refuse_empty_rows_and_left_padding():
    with pytest.raises(ValueError, match=r"rows \[1\] have no real response token"):
        kl_shaped_rewards(SCORES, LOGPROBS, REF_LOGPROBS, length_mask([3, 0, 2], 3), 0.1)
    left = torch.tensor([[True, True, True], [False, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=r"right-padded.*rows \[1\]"):
        kl_shaped_rewards(SCORES, LOGPROBS, REF_LOGPROBS, left, 0.1)


def test_place_step_rewards_positions_and_errors():
    out = place_step_rewards([[1.0, 2.0, 4.0], [-1.0]], [[0, 3, 3], [1]], (2, 4),
                             dtype=torch.float64)
    assert out.tolist() == [[1.0, 0.0, 0.0, 6.0], [0.0, -1.0, 0.0, 0.0]]  # same end: summed
    assert place_step_rewards([[], []], [[], []], (2, 3)).tolist() == [[0.0] * 3] * 2
    with pytest.raises(ValueError, match=r"row 1: step end positions \[4\] outside \[0, 4\)"):
        place_step_rewards([[1.0], [1.0]], [[0], [4]], (2, 4))
    with pytest.raises(ValueError, match="row 0: 2 step rewards but 1 step end"):
        place_step_rewards([[1.0, 2.0], []], [[0], []], (2, 4))
    with pytest.raises(ValueError, match="expected 2 rows"):
        place_step_rewards([[1.0]], [[0]], (2, 4))


# ------------------------------------------------------------------------------------ GAE


def naive_gae(rewards: list[list[float]], values: list[list[float]], lengths: list[int],
              gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """A_t = Σ_l (γλ)^l δ_{t+l} by a double loop, with V = 0 after the last real token."""
    width = len(rewards[0])
    advantages = [[0.0] * width for _ in rewards]
    returns = [[0.0] * width for _ in rewards]
    for b, n in enumerate(lengths):
        deltas = [rewards[b][k] + gamma * (values[b][k + 1] if k + 1 < n else 0.0) - values[b][k]
                  for k in range(n)]
        for t in range(n):
            advantages[b][t] = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, n))
            returns[b][t] = advantages[b][t] + values[b][t]
    return advantages, returns


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.5, 0.3),
                                            (1.0, 1.0)])
def test_gae_equals_naive_loop_with_variable_lengths(gamma, lam):
    gen = torch.Generator().manual_seed(7)
    lengths = [7, 1, 4, 0, 5]
    mask = length_mask(lengths, 7)
    rewards = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    values = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    expected_adv, expected_ret = naive_gae(rewards.tolist(), values.tolist(), lengths, gamma,
                                           lam)
    # padding holds garbage that must not leak into any real position
    rewards = torch.where(mask, rewards, torch.tensor(NAN, dtype=torch.float64))
    values = torch.where(mask, values, torch.tensor(1e9, dtype=torch.float64))
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, t64(expected_adv), rtol=1e-9, atol=1e-12)
    assert torch.allclose(returns, t64(expected_ret), rtol=1e-9, atol=1e-12)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)


def test_gae_hand_numbers():
    # γ = 0.5, λ = 0.5, one row of 3 tokens: δ = (1 + 0.5·2 − 1, 0 + 0.5·4 − 2, 3 − 4) = (1, 0, −1)
    advantages, returns = gae(t64([[1.0, 0.0, 3.0]]), t64([[1.0, 2.0, 4.0]]),
                              torch.ones(1, 3), gamma=0.5, lam=0.5)
    # A_2 = −1, A_1 = 0 + 0.25·(−1), A_0 = 1 + 0.25·(−0.25)
    assert advantages.tolist() == [[0.9375, -0.25, -1.0]]
    assert returns.tolist() == [[1.9375, 1.75, 3.0]]


def test_gae_refuses_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]]), 1.0, 0.95)


# ------------------------------------------------------------------------------ losses


def test_policy_loss_hand_numbers_and_gradient():
    ratio = t64([[1.5, 0.5, 1.0, 0.5, 3.0]])  # last token is padding
    advantages = t64([[2.0, 1.0, -1.0, -2.0, 100.0]])
    mask = length_mask([4], 5)
    old = t64([[-1.0, -2.0, -0.3, -1.2, -0.1]])
    logprobs = (old + ratio.log()).requires_grad_(True)
    out = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # pg_loss1 = −A·ratio: (−3, −0.5, 1, 1); pg_loss2 = −A·clip(ratio): (−2.4, −0.8, 1, 1.6)
    # max: (−2.4, −0.5, 1, 1.6); the clip is active on tokens 0 and 3
    assert out.loss.item() == pytest.approx((-2.4 - 0.5 + 1.0 + 1.6) / 4, rel=1e-12)
    assert out.clipfrac.item() == pytest.approx(0.5, rel=1e-12)
    k3 = (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))  # (r − 1) − log r, r = 1 gives 0
    assert out.approx_kl.item() == pytest.approx(k3 / 4, rel=1e-12)
    out.loss.backward()
    # d/dlog π of −A·ratio is −A·ratio where unclipped, 0 where clipped; mean over 4 tokens
    assert torch.allclose(logprobs.grad, t64([[0.0, -0.5 / 4, 1.0 / 4, 0.0, 0.0]]),
                          rtol=1e-12, atol=1e-15)


def test_clipped_objective_has_zero_gradient_outside_the_clip_range():
    ratio = t64([[1.5, 1.5, 0.5, 0.5, 1.1, 1.1, 0.9, 0.9]])
    advantages = t64([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0]])
    # moved past 1 ± ε in the advantage's direction: (1.5, +) and (0.5, −) → no gradient
    clipped = torch.tensor([[True, False, True, False, False, False, False, False]])
    logprobs = ratio.log().requires_grad_(True)
    policy_loss(logprobs, torch.zeros_like(ratio), advantages, torch.ones_like(ratio),
                clip_range=0.2).loss.backward()
    grad = logprobs.grad
    assert torch.all(grad[clipped] == 0)
    assert torch.allclose(grad[~clipped], (-advantages * ratio / 8)[~clipped], rtol=1e-12)
    assert torch.all(grad[~clipped] != 0)


def test_truncated_is_weights_hand_numbers():
    old = t64([[-1.0, -2.0, -0.5, -3.0, 0.0]])  # last token is padding
    behavior = t64([[-1.0, -1.0, -1.5, -1.0, 50.0]])
    w = truncated_is_weights(old, behavior, length_mask([4], 5), cap=2.0)
    # log w = (0, −1, 1, −2): w = (1, e^−1, min(e, 2), e^−2), 0 on padding
    expected = [[1.0, math.exp(-1.0), 2.0, math.exp(-2.0), 0.0]]
    assert w.dtype == torch.float32
    assert torch.allclose(w.double(), t64(expected), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"cap must be ≥ 1, got 0\.5"):
        truncated_is_weights(old, behavior, length_mask([4], 5), cap=0.5)


def test_truncated_is_weights_equal_a_naive_token_loop():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    behavior = old + torch.randn(4, 6, generator=gen, dtype=torch.float64)
    lengths = [6, 3, 1, 5]
    mask = length_mask(lengths, 6)
    got = truncated_is_weights(old, behavior, mask, cap=1.5)
    for b in range(4):
        for t in range(6):
            want = min(math.exp(old[b, t].item() - behavior[b, t].item()), 1.5) \
                if t < lengths[b] else 0.0
            assert got[b, t].item() == pytest.approx(want, rel=1e-6, abs=1e-12), (b, t)
    assert (got == 1.5).any() and (got[mask] < 1.0).any()  # both branches taken


def test_weighted_advantages_give_the_decoupled_ppo_loss_and_gradient():
    """Folding w into A equals the per-token loop (1/n) Σ w·max(−A·ratio, −A·clip(ratio))."""
    ratio = t64([[1.5, 0.5, 1.0, 0.5, 3.0]])  # the hand case above; last token is padding
    advantages = t64([[2.0, 1.0, -1.0, -2.0, 100.0]])
    weights = t64([[0.5, 2.0, 1.0, 0.25, 0.0]])
    mask = length_mask([4], 5)
    old = t64([[-1.0, -2.0, -0.3, -1.2, -0.1]])
    logprobs = (old + ratio.log()).requires_grad_(True)
    out = policy_loss(logprobs, old, advantages * weights, mask, clip_range=0.2)
    # w·max(pg_loss1, pg_loss2) = (0.5·−2.4, 2·−0.5, 1·1, 0.25·1.6) = (−1.2, −1, 1, 0.4)
    assert out.loss.item() == pytest.approx((-1.2 - 1.0 + 1.0 + 0.4) / 4, rel=1e-12)
    assert out.clipfrac.item() == pytest.approx(0.5, rel=1e-12)  # w > 0 moves no clip
    out.loss.backward()
    naive_lp = (old + ratio.log()).requires_grad_(True)
    terms = []
    for t in range(4):
        r = torch.exp(naive_lp[0, t] - old[0, t])
        a, w = advantages[0, t], weights[0, t]
        terms.append(w * torch.maximum(-a * r, -a * torch.clamp(r, 0.8, 1.2)))
    naive = torch.stack(terms).sum() / 4
    naive.backward()
    assert out.loss.item() == pytest.approx(naive.item(), rel=1e-12)
    assert torch.allclose(logprobs.grad, naive_lp.grad, rtol=1e-12, atol=1e-15)
    # unclipped tokens 1 and 2: −w·A·ratio / 4 = −2·1·0.5/4 and −1·(−1)·1/4
    assert torch.allclose(logprobs.grad, t64([[0.0, -0.25, 0.25, 0.0, 0.0]]),
                          rtol=1e-12, atol=1e-15)


def test_value_loss_hand_numbers_and_gradient():
    values = t64([[1.0, 0.6, 0.0, 1.5, -7.0]]).requires_grad_(True)
    old_values = t64([[0.5, 0.5, 0.5, 0.0, 0.0]])
    returns = t64([[1.0, 1.0, -1.0, 0.0, 5.0]])
    mask = length_mask([4], 5)
    out = value_loss(values, old_values, returns, mask, value_clip=0.2)
    # V_clipped = (0.7, 0.6, 0.3, 0.2); (V − R)² = (0, 0.16, 1, 2.25);
    # (V_clipped − R)² = (0.09, 0.16, 1.69, 0.04); max = (0.09, 0.16, 1.69, 2.25)
    assert out.loss.item() == pytest.approx(0.5 * (0.09 + 0.16 + 1.69 + 2.25) / 4, rel=1e-12)
    assert out.vf_clipfrac.item() == pytest.approx(0.5, rel=1e-12)
    out.loss.backward()
    # clipped branch is constant in V; elsewhere d/dV ½(V − R)²/4 = (V − R)/4
    assert torch.allclose(values.grad, t64([[0.0, -0.4 / 4, 0.0, 1.5 / 4, 0.0]]),
                          rtol=1e-12, atol=1e-15)


def test_explained_variance():
    mask = length_mask([3, 1], 3)
    returns = t64([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0, rel=1e-12)
    # residual (0, 0, 0, −1): unbiased var 0.25; Var[R] of (1, 2, 3, 4) = 5/3 → 1 − 0.15
    values = t64([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85, rel=1e-12)
    constant = torch.full_like(returns, 2.5)  # the mean return: explains nothing
    assert explained_variance(constant, returns, mask) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(explained_variance(returns, torch.ones(2, 3), mask))


# ------------------------------------------------------------------------------- metrics


def test_ppo_stats_metrics_and_mean():
    a = PPOStats(policy_loss=0.5, value_loss=1.0, entropy=2.0, approx_kl=0.01, clipfrac=0.1,
                 vf_clipfrac=0.2, explained_variance=0.3, kl_coef=0.1)
    b = PPOStats(policy_loss=1.5, value_loss=3.0, entropy=4.0, approx_kl=0.03, clipfrac=0.3,
                 vf_clipfrac=0.4, explained_variance=0.5, kl_coef=0.1)
    metrics = a.as_metrics()
    check_keys(metrics)
    assert metrics == {"ppo/policy_loss": 0.5, "ppo/value_loss": 1.0, "ppo/entropy": 2.0,
                       "ppo/approx_kl": 0.01, "ppo/clipfrac": 0.1, "ppo/vf_clipfrac": 0.2,
                       "ppo/explained_variance": 0.3, "ppo/kl_coef": 0.1}
    mean = PPOStats.mean([a, b])
    assert mean.policy_loss == 1.0 and mean.entropy == 3.0 and mean.kl_coef == 0.1
    assert mean.approx_kl == pytest.approx(0.02, rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        PPOStats.mean([])
