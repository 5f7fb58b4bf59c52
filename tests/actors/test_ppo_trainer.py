"""PPO on a toy task with a known reward, and the DeepSpeed PPO trainer on Ray against it.

The toy task. The policy is the random tiny GPT-2 with its final LayerNorm gain scaled by 8
(`peaked_policy`): the plain random model is nearly uniform over 30k tokens (entropy ≈ log V), so
no reward that a few hundred samples can see moves it; scaled, its next-token entropy at T = 0.8
is ≈ 5.6 nats, like a (bad) trained LM. The reward is programmatic: the share of response tokens
whose id is in the lower half of the vocabulary (`TokenRangeReward`), ≈ 0.43 at the start. Each
iteration samples 8 prompts × 2 at T = 0.8, 16 new tokens, and runs 4 PPO epochs × 2 minibatches
(lr 1e-4, adaptive KL from β = 0.05).

The learning rate is aggressive for this peaked model: Adam's first steps move every weight by
about lr, so the last steps of the FIRST update reach approx_kl ≈ 11 with clipfrac ≈ 0.65 (the
clipped objective is what keeps it learning); later updates settle near approx_kl ≈ 1. A gentler
lr (1e-5: approx_kl ≤ 0.05) does not raise the reward within a test's budget of iterations.

Tolerances. The golden trajectory is fp32 on one torch thread, where CPU runs repeat bit for bit;
1e-4 leaves room only for a different BLAS build (a different sampled token would move a mean
reward by 1/256 ≈ 4e-3). The Ray + DeepSpeed ZeRO trainer (one thread per rank) and the plain
torch loop differ in summation order (ZeRO's flat buffers, DeepSpeed's clipping vs
`clip_grad_norm_`), which the overshooting first update amplifies: per-step losses agree to
≤ 1.5e-5 relative (measured, ZeRO-2/ZeRO-3/2 ranks); we assert rel 1e-4, where a sharding,
temperature or masking bug moves them by O(1). Logits: 1e-5 between Ray actors, 1e-4 against
the driver's torch.
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import ray
import torch

from actors.core.ensemble import build_multi_head_reward_model, combine
from actors.core.kl_control import make_kl_controller
from actors.core.metrics import check_keys
from actors.core.policy import load_policy
from actors.core.ppo_step import (
    TokenRangeReward,
    build_experience,
    evaluate_rollout,
    policy_inputs,
    run_ppo_epochs,
    torch_step,
    update_metrics,
)
from actors.core.reward_model import disable_dropout, encode
from actors.core.sampling import RolloutBatch, encode_prompts, generate
from actors.core.value_model import PolicyWithValue
from actors.core.weight_transport import pack_state
from actors.ppo_trainer import PPOTrainerGroup
from actors.rollout import RolloutGroup
from loop.config import EnsembleConfig, KLConfig, ModelSpec, PPOConfig, RolloutConfig

SEED = 0
TEMPERATURE = 0.8
SAMPLES = 2
NEW_TOKENS = 16
ITERATIONS = 8
PROMPTS = [f"Tell me something about topic {i}." for i in range(8)]
CFG = PPOConfig(lr=1e-4, epochs=4, minibatch_size=8,
                kl=KLConfig(controller="adaptive", init_coef=0.05, target=6.0, horizon=1000))
REWARD = TokenRangeReward(0, 30522 // 2)
GOLDEN_REWARDS = [0.46484375, 0.4765625, 0.69921875, 0.5703125, 0.6015625, 0.69921875, 0.921875,
                  0.84765625]
"""Mean toy reward per iteration (recorded once with this file's settings)."""
GOLDEN_KL_COEF = [0.05, 0.04984, 0.04975594772786458, 0.04991516676059376, 0.05007489529422766,
                  0.050235134959169196, 0.05039588739103855, 0.05055715423068986]
"""β each iteration's rewards were shaped with (the adaptive controller's path)."""
MARGIN = 0.25
"""Mean reward of the last 3 iterations minus that of the first 2 (recorded: 0.352)."""
LOSS_KEYS = ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl",
             "ppo/clipfrac", "ppo/vf_clipfrac")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """The peaked tiny GPT-2 saved as a local model directory (`load_policy` takes its path)."""
    policy, tokenizer = load_policy("tiny-gpt2", seed=SEED)
    with torch.no_grad():
        policy.transformer.ln_f.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("peaked-tiny-gpt2")
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass
class CoreRun:
    """What the plain torch loop saw: per iteration the batch, metrics, step history, β after
    the update, and the policy's weights after iteration 0."""

    batches: list[RolloutBatch]
    metrics: list[dict[str, float]]
    histories: list[list[dict[str, float]]]
    kl_after: list[float]
    state_after_first: dict[str, torch.Tensor]


def run_core_loop(policy_dir, iterations: int) -> CoreRun:
    """PPO with the core functions and a plain torch optimizer, on one thread."""
    policy, tokenizer = load_policy(str(policy_dir), seed=SEED)
    disable_dropout(policy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    model = PolicyWithValue(policy).train()
    step = torch_step(model, torch.optim.AdamW(model.parameters(), lr=CFG.lr), CFG.max_grad_norm)
    kl = make_kl_controller(CFG.kl)
    run = CoreRun([], [], [], [], {})
    for it in range(iterations):
        batch = generate(policy, tokenizer, PROMPTS, SAMPLES, NEW_TOKENS, TEMPERATURE, seed=it)
        inputs = policy_inputs(batch)
        exp = build_experience(inputs, evaluate_rollout(model, ref, inputs, CFG.minibatch_size),
                               REWARD(batch), kl.value, CFG, sampler_logprobs=batch.logprobs)
        history = run_ppo_epochs(model, exp, CFG, step, seed=SEED, update=it)
        kl.update(float(exp.kl.mean()), exp.num_rows)
        run.batches.append(batch)
        run.metrics.append(update_metrics(exp, history))
        run.histories.append([h.as_metrics() for h in history])
        run.kl_after.append(kl.value)
        if it == 0:
            run.state_after_first = {k: v.clone() for k, v in model.policy_state_dict().items()}
    return run


@pytest.fixture(scope="module")
def core(policy_dir) -> CoreRun:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_core_loop(policy_dir, ITERATIONS)
    finally:
        torch.set_num_threads(threads)


def spec_of(policy_dir) -> ModelSpec:
    return ModelSpec(name=str(policy_dir), max_length=64)


@pytest.fixture(scope="module")
def trained(ray_local, policy_dir, core):
    """A one-rank ZeRO-2 trainer after one update on the core loop's first batch."""
    group = PPOTrainerGroup.launch(1, spec_of(policy_dir), CFG, EnsembleConfig(), SEED,
                                   name_prefix="ppo-test-main", num_cpus=0.5)
    try:
        group.set_reward_fn(7, REWARD)
        result = group.update(ray.put(core.batches[0]))
        yield group, result
    finally:
        group.shutdown()


@pytest.fixture
def launch(ray_local, request, policy_dir):
    """Start PPO groups with test-unique names; kill them when the test ends."""
    groups: list[PPOTrainerGroup] = []
    counter = itertools.count()

    def _launch(world_size: int, **kwargs) -> PPOTrainerGroup:
        group = PPOTrainerGroup.launch(
            world_size, spec_of(policy_dir), kwargs.pop("cfg", CFG),
            kwargs.pop("ensemble", EnsembleConfig()), SEED,
            name_prefix=f"ppo-{request.node.name}-{next(counter)}", num_cpus=0.5, **kwargs)
        groups.append(group)
        return group

    yield _launch
    for group in groups:
        group.shutdown()


def assert_same_update(history: tuple[dict[str, float], ...], expected: list[dict[str, float]]):
    assert len(history) == len(expected) == CFG.epochs * 2
    for step, (got, want) in enumerate(zip(history, expected, strict=True)):
        for key in LOSS_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (step, key)


# ------------------------------------------------------------------ the toy task, plain torch


def test_ppo_raises_the_toy_reward_along_the_golden_trajectory(core):
    rewards = [m["ppo/mean_reward"] for m in core.metrics]
    assert sum(rewards[-3:]) / 3 - sum(rewards[:2]) / 2 >= MARGIN
    assert rewards == pytest.approx(GOLDEN_REWARDS, abs=1e-4)
    assert [m["ppo/kl_coef"] for m in core.metrics] == pytest.approx(GOLDEN_KL_COEF, rel=1e-6)
    first = core.metrics[0]
    assert first["ppo/mean_kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref before any step
    assert core.histories[0][0]["ppo/clipfrac"] == 0.0
    assert core.histories[0][0]["ppo/approx_kl"] < 1e-10
    assert all(m["ppo/sampler_logprob_gap"] < 1e-4 for m in core.metrics)  # same temperature
    assert core.metrics[-1]["ppo/mean_kl"] > 1.0  # the policy left the reference


# ------------------------------------------------------------- the Ray + DeepSpeed trainer


def test_trainer_update_equals_the_core_loop(trained, core):
    group, result = trained
    assert_same_update(result.history, core.histories[0])
    check_keys(result.metrics)
    for key, value in core.metrics[0].items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert result.rm_version == 7 and result.metrics["ppo/rm_version"] == 7.0
    torch.testing.assert_close(result.rewards, REWARD(core.batches[0]))
    assert result.metrics["timing/ppo_update"] > 0 and result.metrics["ppo/tokens_per_s"] > 0
    assert group.state_dict() == {"kl": {"value": pytest.approx(core.kl_after[0], rel=1e-9)},
                                  "updates": 1}
    assert group.info()[0]["zero_stage"] == 2


def fixed_input(policy_dir):
    _, tokenizer = load_policy(str(policy_dir), seed=SEED)
    return encode_prompts(tokenizer, ["What is the capital of France?", "Say hi."])


def test_publish_reaches_a_rollout_worker_with_identical_logits(trained, core, policy_dir):
    group, _ = trained
    ids, mask = fixed_input(policy_dir)
    rollout = RolloutGroup.launch(1, spec_of(policy_dir),
                                  RolloutConfig(samples_per_prompt=SAMPLES,
                                                max_new_tokens=NEW_TOKENS,
                                                temperature=TEMPERATURE),
                                  seed=SEED, name_prefix="ppo-test-rollout", num_cpus=0.5)
    try:
        before = rollout.logits(ids, mask)[0]
        weights = group.publish(1)
        assert group.info()[0]["published"] == 1
        assert rollout.publish(1, weights) == weights
        assert rollout.versions() == [1]
        after = rollout.logits(ids, mask)[0]
    finally:
        rollout.shutdown()
    trainer_logits = group.logits(ids, mask)
    torch.testing.assert_close(after, trainer_logits, rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-2  # the update moved the policy
    policy, _ = load_policy(str(policy_dir), seed=SEED)
    policy.load_state_dict(core.state_after_first)
    with torch.no_grad():
        core_logits = policy(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, core_logits, rtol=0, atol=1e-4)


def test_checkpoint_round_trip_resumes_the_same_update(trained, core, policy_dir, tmp_path):
    group, _ = trained
    ids, mask = fixed_input(policy_dir)
    group.save_checkpoint(tmp_path / "ppo")
    saved_logits = group.logits(ids, mask)
    second = group.update(ray.put(core.batches[1]))  # iteration 1 continues the core loop
    assert_same_update(second.history, core.histories[1])
    assert group.state_dict()["kl"]["value"] == pytest.approx(core.kl_after[1], rel=1e-6)
    group.load_checkpoint(tmp_path / "ppo")  # back to after iteration 0
    assert group.state_dict() == {"kl": {"value": pytest.approx(core.kl_after[0], rel=1e-9)},
                                  "updates": 1}
    torch.testing.assert_close(group.logits(ids, mask), saved_logits, rtol=0, atol=0)
    again = group.update(ray.put(core.batches[1]))  # same weights, Adam moments, β, shuffle
    for got, want in zip(again.history, second.history, strict=True):
        for key in LOSS_KEYS:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    group.load_checkpoint(tmp_path / "ppo")  # leave the module's trainer after iteration 0


def test_zero3_and_two_ranks_take_the_same_steps(launch, core):
    zero3 = launch(1, cfg=CFG.model_copy(update={"zero_stage": 3}))
    zero3.set_reward_fn(0, REWARD)
    assert zero3.info()[0]["zero_stage"] == 3
    assert_same_update(zero3.update(core.batches[0]).history, core.histories[0])
    zero3.shutdown()
    two = launch(2)
    two.set_reward_fn(0, REWARD)
    assert [i["rank"] for i in two.info()] == [0, 1]
    assert_same_update(two.update(core.batches[0]).history, core.histories[0])


def test_reward_model_ensemble_scores_are_combined_and_stamped(launch, core):
    """A 2-head RM ensemble sent as packed weights scores like the same RM in the driver."""
    spec = ModelSpec(name="tiny-bert", max_length=96)
    ensemble = EnsembleConfig(members=2, combine="min")
    rm, tokenizer = build_multi_head_reward_model(spec.name, 2, seed=5)
    group = launch(2, ensemble=ensemble, reward_spec=spec)
    group.set_reward_model(3, ray.put(pack_state(rm.state_dict())))
    batch = core.batches[0]
    prompts = [batch.prompts[i] for i in batch.prompt_index.tolist()]
    tokens = encode(tokenizer, prompts, list(batch.texts), spec.max_length)
    with torch.no_grad():
        members = rm.eval()(tokens.input_ids, tokens.attention_mask)  # (2, N)
    scores = group.score(batch)
    assert scores.rm_version == 3
    torch.testing.assert_close(scores.members, members, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.rewards, combine(members, "min"), rtol=0, atol=1e-5)
    assert not torch.equal(members[0], members[1])
    result = group.update(batch)
    assert result.rm_version == 3
    torch.testing.assert_close(result.rewards, scores.rewards, rtol=0, atol=1e-6)
    assert result.metrics["ppo/mean_reward"] == pytest.approx(float(scores.rewards.mean()))
    single, _ = build_multi_head_reward_model(spec.name, 3, seed=5)
    with pytest.raises(ValueError, match="3 member head"):
        group.set_reward_model(4, ray.put(pack_state(single.state_dict())))
