"""RewardTrainer under DeepSpeed ZeRO on CPU/gloo: learning, data-parallel and ZeRO invariance,
and save → load, with the random `tiny-bert` backbone so each group trains in seconds.

Tolerances. fp32 throughout; the runs being compared differ only in summation order (how the
global batch is split into micro-batches, the order of the gloo all-reduce, ZeRO's flat
partitioned buffers), so per-step losses agree to ~2e-7 (measured) and we assert rtol 1e-5, head
weights to ~1e-6 (assert atol 1e-5). Adam divides each gradient coordinate by its own RMS, so a
coordinate whose true gradient is exactly 0 turns that float noise into steps of up to lr. Two
kinds of parameter are exactly invisible to Bradley–Terry, which sees only r_w − r_l: attention
key biases (softmax is shift-invariant) and the bias of the last LayerNorm (r = w·LN(x) — the bias
adds w·β to both rewards). Those are left out of the whole-model check; on the rest the two runs'
updates θ − θ₀ agree to ~4e-4 relative in norm (measured; assert 2e-3), where a sharding or
reduction bug gives O(1).
"""

from __future__ import annotations

import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import ray
import torch

from actors.core.backbones import TINY_BERT
from actors.core.bradley_terry import bradley_terry_loss
from actors.core.ensemble import MultiHeadRewardModel, load_reward_model
from actors.core.hh import load_hh_jsonl
from actors.core.metrics import check_keys
from actors.core.reward_model import RewardModel, encode, load_tokenizer
from actors.core.weight_transport import pack_state
from actors.dist import epoch_batches, epoch_permutation, rank_chunk
from actors.reward_trainer import FitResult, RewardTrainerGroup
from loop.config import ModelSpec, RMConfig

SPEC = ModelSpec(name="tiny-bert", max_length=96)
LAST = TINY_BERT["num_hidden_layers"] - 1
LOSS_INVISIBLE = ("attention.self.key.bias", f"layer.{LAST}.output.LayerNorm.bias")
SEED = 0


@pytest.fixture(scope="module")
def pairs(shared_data):
    return load_hh_jsonl(shared_data / "hh-rlhf" / "train.jsonl.gz", limit=64)


@pytest.fixture
def launch(ray_local, request):
    """Start groups with test-unique actor names; kill them all when the test ends."""
    groups: list[RewardTrainerGroup] = []
    counter = itertools.count()

    def _launch(world_size: int, spec: ModelSpec = SPEC, **cfg) -> RewardTrainerGroup:
        rm_cfg = RMConfig(trainers=world_size, **cfg)
        group = RewardTrainerGroup.launch(
            world_size, spec, rm_cfg, seed=SEED,
            name_prefix=f"rm-trainer-{request.node.name}-{next(counter)}")
        groups.append(group)
        return group

    yield _launch
    for group in groups:
        group.shutdown()


def bt_loss_on(group: RewardTrainerGroup, pairs) -> float:
    rewards = group.score([p.prompt for p in pairs] * 2,
                          [p.chosen for p in pairs] + [p.rejected for p in pairs])
    return bradley_terry_loss(*rewards.chunk(2)).item()


def assert_same_training(a: tuple[FitResult, dict, dict], b: tuple[FitResult, dict, dict]):
    (fit_a, start_a, end_a), (fit_b, start_b, end_b) = a, b
    assert fit_a.steps == fit_b.steps > 0
    losses_a = torch.tensor([h["rm/loss"] for h in fit_a.history])
    losses_b = torch.tensor([h["rm/loss"] for h in fit_b.history])
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-5, atol=0)
    assert all(torch.equal(start_a[k], start_b[k]) for k in start_a)  # same init
    torch.testing.assert_close(end_a["head.weight"], end_b["head.weight"], rtol=0, atol=1e-5)
    visible = [k for k in start_a if not k.endswith(LOSS_INVISIBLE)]
    assert len(start_a) - len(visible) == 3  # 2 key biases + the last LayerNorm bias
    update_a = torch.cat([(end_a[k] - start_a[k]).flatten() for k in visible])
    update_b = torch.cat([(end_b[k] - start_b[k]).flatten() for k in visible])
    assert (update_a - update_b).norm() <= 2e-3 * update_a.norm()
    assert update_a.norm() > 0.1  # the runs did move


def train(group: RewardTrainerGroup, pairs, epochs: int) -> tuple[FitResult, dict, dict]:
    """Fit, then free the group's CPUs for the next one (the session has 2)."""
    start = group.state_dict()
    result = group.fit(pairs, epochs=epochs)
    end = group.state_dict()
    group.shutdown()
    return result, start, end


def test_epoch_batches_give_the_same_global_batches_for_any_world_size():
    n, seed = 37, 5
    one = epoch_batches(n, world_size=1, rank=0, micro_batch=4, seed=seed, epoch=2)
    two = [epoch_batches(n, world_size=2, rank=r, micro_batch=2, seed=seed, epoch=2)
           for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 37 // 4  # the partial batch is dropped
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][step] + two[1][step])
    perm = epoch_permutation(n, seed, 2)
    assert one[0] == perm[:4] and two[1][0] == [perm[1], perm[3]]
    assert epoch_permutation(n, seed, 3) != perm and sorted(perm) == list(range(n))
    assert [list(rank_chunk(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(rank_chunk(1, 3, r)) for r in range(3)] == [1, 0, 0]


def test_length_grouped_batches_pad_less_and_keep_the_invariants():
    n, seed, lengths = 96, 3, [(i * 37) % 101 + 5 for i in range(96)]
    one = epoch_batches(n, 1, 0, micro_batch=4, seed=seed, epoch=0, lengths=lengths, window=8)
    two = [epoch_batches(n, 2, r, micro_batch=2, seed=seed, epoch=0, lengths=lengths, window=8)
           for r in range(2)]
    assert len(one) == 24 and sorted(i for b in one for i in b) == list(range(n))
    for step, batch in enumerate(one):  # the same global batches for any world size
        assert batch[0::2] == two[0][step] and batch[1::2] == two[1][step]
    plain = epoch_batches(n, 1, 0, micro_batch=4, seed=seed, epoch=0)

    def padding(batches):  # padded tokens when each batch pads to its longest item
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    assert padding(one) < 0.25 * padding(plain)
    maxima = [max(lengths[i] for i in b) for b in one]
    assert maxima != sorted(maxima)
    again = epoch_batches(n, 1, 0, micro_batch=4, seed=seed, epoch=0, lengths=lengths, window=8)
    later = epoch_batches(n, 1, 0, micro_batch=4, seed=seed, epoch=1, lengths=lengths, window=8)
    assert again == one and later != one


def test_one_trainer_learns_real_hh_pairs(launch, pairs):
    group = launch(1, zero_stage=2, lr=1e-3, micro_batch_size=8)
    before = bt_loss_on(group, pairs)
    result = group.fit(pairs, epochs=3)
    after = bt_loss_on(group, pairs)
    assert before == pytest.approx(math.log(2), abs=0.01)  # small random head: a coin flip
    assert after < 0.5 * before  # stated margin: the loss on the 64 pairs at least halves
    assert group.evaluate(pairs).accuracy >= 0.9
    assert (result.steps, result.pairs_seen) == (3 * 64 // 8, 3 * 64)
    assert result.final_loss == result.history[-1]["rm/loss"]
    assert result.mean_loss == pytest.approx(sum(h["rm/loss"] for h in result.history) / 24)
    assert result.history[-1]["rm/accuracy"] >= 0.75  # the last steps have learned a lot
    assert set(result.metrics) == {"rm/loss", "rm/accuracy", "rm/mean_margin", "rm/ece",
                                   "rm/pairs_per_s", "timing/rm_fit"}
    assert result.metrics["timing/rm_fit"] > 0
    check_keys(result.metrics)  # the one metrics path accepts them
    check_keys(result.history[0])


def test_bf16_on_cpu_trains_with_scaled_query_attention_and_learns(launch, pairs):
    spec = ModelSpec(name="tiny-bert", max_length=96, dtype="bfloat16")
    group = launch(1, spec=spec, zero_stage=2, lr=1e-3, micro_batch_size=8)
    info = ray.get(group.actors[0].info.remote())
    assert (info["attention"], info["dtype"]) == ("scaled_query", "bfloat16")
    before = bt_loss_on(group, pairs)
    group.fit(pairs, epochs=3)
    after = bt_loss_on(group, pairs)
    assert before == pytest.approx(math.log(2), abs=0.02)  # bf16 rewards: a coarser coin flip
    assert after < 0.5 * before  # the same stated margin as the fp32 run above
    assert group.evaluate(pairs).accuracy >= 0.9


def test_one_worker_equals_two_workers(launch, pairs):
    one = train(launch(1, zero_stage=2, lr=1e-3, micro_batch_size=4), pairs[:32], epochs=1)
    two = train(launch(2, zero_stage=2, lr=1e-3, micro_batch_size=2), pairs[:32], epochs=1)
    assert one[0].steps == 8 and one[0].pairs_seen == two[0].pairs_seen == 32
    assert_same_training(one, two)


def test_zero1_equals_zero3(launch, pairs):
    zero1 = train(launch(2, zero_stage=1, lr=1e-3, micro_batch_size=2), pairs[:32], epochs=1)
    zero3 = train(launch(2, zero_stage=3, lr=1e-3, micro_batch_size=2), pairs[:32], epochs=1)
    assert_same_training(zero1, zero3)


def test_save_load_gives_the_same_scores(launch, pairs, tmp_path):
    group = launch(2, zero_stage=3, lr=1e-3, micro_batch_size=4)  # ZeRO-3: gathered on save
    group.fit(pairs[:16], epochs=1)
    sample = pairs[16:21]  # 5 items: uneven split over 2 ranks (3 + 2)
    prompts, responses = [p.prompt for p in sample], [p.chosen for p in sample]
    scores = group.score(prompts, responses)
    trained = group.state_dict()
    group.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    assert all(torch.equal(trained[k], v) for k, v in loaded.state_dict().items())
    batch = encode(load_tokenizer(tmp_path / "rm"), prompts, responses, SPEC.max_length)
    with torch.no_grad():
        local = loaded(batch.input_ids, batch.attention_mask)
    assert scores.shape == (5,)
    torch.testing.assert_close(local, scores, rtol=1e-5, atol=1e-5)
    assert scores.std() > 1e-3  # the scores are not all alike


@pytest.mark.parametrize(("world_size", "stage"), [(1, 2), (2, 3)])
def test_warm_start_equals_a_new_group_started_from_those_weights(launch, pairs, world_size,
                                                                  stage):
    import ray

    cfg = {"zero_stage": stage, "lr": 1e-3, "micro_batch_size": 8 // world_size}
    first = launch(world_size, **cfg)
    first.fit(pairs[:16], epochs=1)
    serving = first.state_dict()
    packed = ray.put(pack_state(serving))
    first.fit(pairs[16:32], epochs=1)  # moves the weights and the Adam moments on
    first.load_state(packed)
    assert all(torch.equal(v, serving[k]) for k, v in first.state_dict().items())
    warm = (first.fit(pairs[32:64], epochs=1), None, first.state_dict())
    first.shutdown()
    fresh = launch(world_size, **cfg)
    fresh.load_state(packed)
    cold = (fresh.fit(pairs[32:64], epochs=1), None, fresh.state_dict())
    fresh.shutdown()
    assert_same_training((warm[0], serving, warm[2]), (cold[0], serving, cold[2]))


def test_an_ensemble_trains_k_heads_on_bootstrap_resamples(launch, pairs, tmp_path):
    group = launch(1, zero_stage=2, lr=1e-3, micro_batch_size=8,
                   ensemble={"members": 3, "combine": "min"})
    result = group.fit(pairs, epochs=2, bootstrap_seed=4)
    sample = pairs[:6]
    prompts, responses = [p.prompt for p in sample], [p.chosen for p in sample]
    members = group.score_members(prompts, responses)
    assert members.shape == (3, 6) and result.steps == 16
    assert (members[0] - members[1]).abs().max() > 1e-3  # members differ
    torch.testing.assert_close(group.score(prompts, responses), members.min(dim=0).values)
    assert group.evaluate(pairs).accuracy >= 0.8  # the combined ensemble learned the pairs
    group.save(tmp_path / "ens")
    loaded = load_reward_model(tmp_path / "ens")
    assert isinstance(loaded, MultiHeadRewardModel) and loaded.members == 3
    batch = encode(load_tokenizer(tmp_path / "ens"), prompts, responses, SPEC.max_length)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch.input_ids, batch.attention_mask), members,
                                   rtol=1e-5, atol=1e-5)
