"""The PPO step on a real (random tiny-GPT-2) policy: temperature-consistent log-probs, a first
step at ratio 1 with hand-derived losses, hand-derived experience, sharded-gradient invariance,
and a separate critic that shares no gradient with the policy.

Tolerances: fp32 on CPU. Recomputing the sampler's log-probs in a full forward pass differs from
the KV-cache decode only in summation order (~5e-7 measured; assert 1e-5). Gradients of a
minibatch split over two "ranks" vs one differ in summation order (≤ 6e-8 absolute measured, for
gradients up to 0.5; assert atol 3e-7 + rtol 1e-4).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from actors.core.metrics import check_keys
from actors.core.policy import load_policy
from actors.core.ppo_math import masked_mean
from actors.core.ppo_step import (
    STAT_NAMES,
    Experience,
    PolicyInputs,
    RolloutEval,
    TokenRangeReward,
    build_experience,
    evaluate_rollout,
    minibatch_loss,
    minibatches,
    policy_inputs,
    run_ppo_epochs,
    tempered_logprobs,
    torch_step,
    update_metrics,
)
from actors.core.sampling import generate
from actors.core.value_model import PolicyWithValue, response_logits
from loop.config import PPOConfig

TEMPERATURE = 0.7
PROMPTS = ["Name a color.", "Why is the sky blue?", "Count to three.", "Say hi."]


@pytest.fixture(scope="module")
def setup():
    """A tiny policy, its frozen copy, and an 8-row batch sampled at T = 0.7."""
    policy, tokenizer = load_policy("tiny-gpt2", seed=0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = generate(policy, tokenizer, PROMPTS, 2, max_new_tokens=6, temperature=TEMPERATURE,
                     seed=3)
    return policy, ref, batch


def fresh_model(policy, separate_critic: bool = False) -> PolicyWithValue:
    return PolicyWithValue(copy.deepcopy(policy), separate_critic).train()


def test_value_head_starts_at_zero_and_logits_are_the_response_columns(setup):
    policy, _, batch = setup
    model = fresh_model(policy)
    inputs = policy_inputs(batch)
    out = model(inputs.input_ids, inputs.attention_mask, inputs.response_start)
    n, tr = batch.response_ids.shape
    assert out.values.shape == (n, tr) and torch.equal(out.values, torch.zeros(n, tr))
    full = policy(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                  position_ids=(inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    start = inputs.response_start
    torch.testing.assert_close(out.logits, full[:, start - 1:-1], rtol=0, atol=1e-5)


def test_logprobs_are_taken_at_the_sampling_temperature(setup):
    policy, ref, batch = setup
    model = fresh_model(policy)
    inputs = policy_inputs(batch)
    evaluated = evaluate_rollout(model, ref, inputs, chunk=3)  # chunks of 3, 3, 2 rows
    keep = inputs.response_mask
    assert inputs.temperature == TEMPERATURE
    torch.testing.assert_close(evaluated.logprobs[keep], batch.logprobs[keep], rtol=0, atol=1e-5)
    assert torch.equal(evaluated.logprobs[~keep], torch.zeros_like(evaluated.logprobs[~keep]))
    torch.testing.assert_close(evaluated.ref_logprobs, evaluated.logprobs, rtol=0, atol=1e-6)
    # Read at T = 1 instead, the same tokens' log-probs are ~0.08 off on average (the random
    # model is nearly uniform, so the temperature matters little, yet 8000× the tolerance).
    logits, _ = response_logits(policy, inputs.input_ids, inputs.attention_mask,
                                inputs.response_start)
    at_one = tempered_logprobs(logits, inputs.response_ids, 1.0)
    assert (at_one[keep] - batch.logprobs[keep]).abs().mean() > 0.01


def experience(model, ref, batch, kl_coef=0.1, **cfg) -> tuple[Experience, PPOConfig]:
    settings = PPOConfig(**cfg)
    inputs = policy_inputs(batch)
    scores = torch.linspace(-1.0, 1.0, batch.num_rows)
    evaluated = evaluate_rollout(model, ref, inputs, chunk=8)
    return build_experience(inputs, evaluated, scores, kl_coef, settings,
                            sampler_logprobs=batch.logprobs), settings


def test_first_minibatch_step_has_ratio_one_and_hand_derived_losses(setup):
    """Old == new policy: ratio 1, nothing clipped, approx_kl 0; then L_pg = −mean(A) and, with
    V = V_old = 0, L_vf = ½·mean(R²) (no value clip can be active)."""
    policy, ref, batch = setup
    model = fresh_model(policy)
    exp, settings = experience(model, ref, batch, minibatch_size=4)
    rows = minibatches(exp.num_rows, 4, seed=0, update=0, epoch=0)[0]
    part = minibatch_loss(model, exp, rows, int(exp.inputs.response_mask[rows].sum()), 1,
                          settings)
    stats = dict(zip(STAT_NAMES, part.stats.tolist(), strict=True))
    inputs = exp.inputs.rows(rows)
    out = model(inputs.input_ids, inputs.attention_mask, inputs.response_start)
    new = tempered_logprobs(out.logits, inputs.response_ids, inputs.temperature)
    ratio = torch.exp(new - exp.old_logprobs[rows])[inputs.response_mask]
    assert (ratio - 1).abs().max() < 1e-5
    assert stats["clipfrac"] == 0.0 and stats["vf_clipfrac"] == 0.0
    assert 0.0 <= stats["approx_kl"] < 1e-10
    mask = inputs.response_mask
    assert stats["policy_loss"] == pytest.approx(
        -float(masked_mean(exp.advantages[rows], mask)), abs=1e-6)
    assert stats["value_loss"] == pytest.approx(
        0.5 * float(masked_mean(exp.returns[rows].square(), mask)), rel=1e-6)
    assert part.share == 1.0
    # entropy of π_T at 0.7 of a near-uniform 30k-token model: just below log V
    assert 9.0 < stats["entropy"] < torch.log(torch.tensor(30522.0)).item()


def test_experience_is_hand_derived_with_a_zero_critic(setup):
    """β = 0, γ = λ = 1, no whitening and V ≡ 0: every real token's return and advantage is
    the row's score; with β > 0 the rewards of a row sum to score − β·KL."""
    policy, ref, batch = setup
    model = fresh_model(policy)
    exp, _ = experience(model, ref, batch, kl_coef=0.0, gamma=1.0, lam=1.0,
                        whiten_advantages=False)
    keep = exp.inputs.response_mask
    score_per_token = exp.scores[:, None].expand_as(keep)
    assert torch.equal(exp.returns[keep], score_per_token[keep])
    assert torch.equal(exp.advantages[keep], score_per_token[keep])
    # a drifted "reference": a constant log-prob offset of 0.25 per token
    evaluated = RolloutEval(exp.old_logprobs, exp.old_logprobs - 0.25 * keep, exp.old_values)
    shaped = build_experience(exp.inputs, evaluated, exp.scores, 0.5,
                              PPOConfig(gamma=1.0, lam=1.0, whiten_advantages=False))
    lengths = keep.sum(1).float()
    torch.testing.assert_close(shaped.kl, 0.25 * lengths)
    torch.testing.assert_close(shaped.rewards.sum(1), exp.scores - 0.5 * 0.25 * lengths)
    metrics = shaped.metrics()
    check_keys(metrics)
    assert metrics["ppo/mean_kl"] == pytest.approx(0.25 * float(lengths.mean()))
    assert metrics["ppo/mean_non_score_reward"] == pytest.approx(-0.5 * metrics["ppo/mean_kl"])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_ranks_sum_to_one_rank_gradient(setup):
    """Rank losses scaled by W·share: their mean gradient is the whole minibatch's gradient."""
    policy, ref, batch = setup
    model = fresh_model(policy)
    exp, settings = experience(model, ref, batch, minibatch_size=8, entropy_coef=0.01)
    rows = minibatches(exp.num_rows, 8, seed=0, update=0, epoch=0)[0]
    tokens = int(exp.inputs.response_mask[rows].sum())
    whole = minibatch_loss(model, exp, rows, tokens, 1, settings)
    whole.loss.backward()
    expected = grads(model)
    model.zero_grad()
    parts = [minibatch_loss(model, exp, rows[r::2], tokens, 2, settings) for r in range(2)]
    for part in parts:
        (part.loss / 2).backward()  # DeepSpeed averages the ranks' gradients
    got = grads(model)
    assert sum(p.share for p in parts) == pytest.approx(1.0)
    assert 0.0 < parts[0].share < 1.0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=3e-7, msg=name)
    torch.testing.assert_close(parts[0].stats + parts[1].stats, whole.stats, rtol=1e-5,
                               atol=1e-7)


def test_separate_critic_shares_no_gradient_with_the_policy(setup):
    policy, ref, batch = setup
    model = fresh_model(policy, separate_critic=True)
    with torch.no_grad():  # a zero head (the initial one) would pass no gradient to the critic
        model.value_head.weight.fill_(0.01)
    exp, settings = experience(model, ref, batch)
    rows = list(range(exp.num_rows))
    tokens = int(exp.inputs.response_mask.sum())
    part = minibatch_loss(model, exp, rows, tokens, 1, PPOConfig(vf_coef=1.0, clip_range=0.2))
    part.loss.backward()
    policy_grads = [p.grad for p in model.policy.parameters()]
    critic_grads = [p.grad for p in model.critic.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in policy_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in critic_grads)
    model.zero_grad(set_to_none=True)
    # the value loss alone: nothing reaches the policy
    out = model(exp.inputs.input_ids, exp.inputs.attention_mask, exp.inputs.response_start)
    masked_mean((out.values - exp.returns).square(), exp.inputs.response_mask).backward()
    assert all(p.grad is None for p in model.policy.parameters())
    assert model.value_head.weight.grad.abs().sum() > 0
    del settings


def test_minibatches_partition_each_epoch_and_reshuffle():
    first = minibatches(10, 4, seed=1, update=0, epoch=0)
    assert [len(b) for b in first] == [4, 4]  # 10 // 4 runs; 2 rows wait for the next epoch
    assert len(set(first[0]) | set(first[1])) == 8
    assert first == minibatches(10, 4, seed=1, update=0, epoch=0)
    assert first != minibatches(10, 4, seed=1, update=0, epoch=1)
    assert first != minibatches(10, 4, seed=1, update=1, epoch=0)
    with pytest.raises(ValueError, match="minibatch_size=12"):
        minibatches(10, 12, seed=1, update=0, epoch=0)


def test_run_ppo_epochs_takes_epochs_times_minibatches_steps_and_changes_the_policy(setup):
    policy, ref, batch = setup
    model = fresh_model(policy)
    exp, settings = experience(model, ref, batch, epochs=3, minibatch_size=4, lr=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    history = run_ppo_epochs(model, exp, settings, torch_step(model, optimizer, 1.0), seed=0,
                             update=0)
    assert len(history) == 3 * 2
    assert history[0].clipfrac == 0.0 and history[0].approx_kl < 1e-10
    assert history[-1].approx_kl > 1e-6  # later steps see a moved policy
    assert all(h.kl_coef == pytest.approx(0.1) for h in history)
    metrics = update_metrics(exp, history)
    check_keys(metrics)
    assert metrics["ppo/sampler_logprob_gap"] < 1e-5
    assert metrics["ppo/policy_loss"] == pytest.approx(
        sum(h.policy_loss for h in history) / len(history))
    with pytest.raises(ValueError, match="multiple of"):
        run_ppo_epochs(model, exp, PPOConfig(minibatch_size=3), lambda loss: None, 0, 0,
                       world_size=2)


def test_token_range_reward_is_the_share_of_tokens_in_range():
    batch = PolicyInputs(input_ids=torch.zeros(2, 3), attention_mask=torch.ones(2, 3),
                         response_ids=torch.tensor([[3, 9, 10], [10, 2, 5]]),
                         response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(),
                         response_start=0, temperature=1.0)
    assert TokenRangeReward(3, 10)(batch).tolist() == pytest.approx([2 / 3, 0.0])  # 5 is padding
